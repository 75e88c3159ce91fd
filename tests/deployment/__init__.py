"""Tests of the Prefect deployments in prefect.yaml, on a real local Prefect server and worker."""
