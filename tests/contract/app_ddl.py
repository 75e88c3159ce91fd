"""The application's schema as its own migrations leave it, written for the tests from
design/APP_SCHEMA.md: deliberately not imported from the project, so the pipeline is checked
against the contract and not against its own idea of it.

Two parts: the contract tables the pipeline fills (`CONTRACT_DDL`), and the app's own tables
that point at them (`APP_OWN_DDL`: coaching sessions, analysis runs, the speaker-role history and
its trigger). `create_app_schema` runs both, as on a database where the app's migrations ran;
`create_app_own_tables` runs only the second, for a database whose contract tables the pipeline
created. Every name is qualified with `public`, function bodies included: a trigger runs in the
writer's session, whose search_path is the pipeline's business.
"""

from __future__ import annotations

import psycopg

#: Extensions the app's migrations install. The embedded test server lacks some contrib modules;
#: nothing here needs them (`gen_random_uuid()` is built in since PostgreSQL 13).
EXTENSIONS = ("uuid-ossp", "pgcrypto", "pg_trgm")

#: Tables the pipeline writes, in the app's shape.
CONTRACT_TABLES = (
    "users", "calls", "speakers", "transcripts", "opportunities", "emails", "call_opportunities", "sync_status",
)  # fmt: skip
#: Tables the app writes that point at pipeline rows.
APP_OWN_TABLES = ("coaching_sessions", "analysis_runs", "speaker_role_history")

CONTRACT_DDL = """
CREATE TYPE public.speaker_role AS ENUM ('ae', 'se', 'csm', 'support');
CREATE TYPE public.user_role AS ENUM ('admin', 'manager', 'rep');

CREATE TABLE public.users (
    id uuid PRIMARY KEY,
    email varchar NOT NULL UNIQUE,
    name varchar NOT NULL,
    role public.user_role NOT NULL DEFAULT 'rep',
    created_at timestamp DEFAULT now(),
    updated_at timestamp DEFAULT now()
);

CREATE TABLE public.calls (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    gong_call_id varchar NOT NULL UNIQUE,
    title varchar,
    scheduled_at timestamp without time zone,
    duration_seconds integer,
    call_type varchar,
    product varchar,
    created_at timestamp DEFAULT now(),
    processed_at timestamp,
    metadata jsonb,
    prefect_reps varchar[] DEFAULT '{}',
    overall_score integer,
    date date
);
CREATE INDEX idx_calls_scheduled_product ON public.calls (scheduled_at DESC, product);
CREATE INDEX idx_calls_date ON public.calls (date DESC NULLS LAST);
CREATE INDEX idx_calls_processed_at ON public.calls (processed_at) WHERE processed_at IS NOT NULL;
CREATE INDEX idx_calls_prefect_reps ON public.calls USING gin (prefect_reps);
CREATE INDEX idx_calls_overall_score ON public.calls (overall_score) WHERE overall_score IS NOT NULL;

CREATE TABLE public.speakers (
    id uuid PRIMARY KEY,
    call_id uuid NOT NULL REFERENCES public.calls (id) ON DELETE CASCADE,
    name varchar NOT NULL,
    email varchar,
    company_side boolean NOT NULL DEFAULT false,
    talk_time_seconds integer,
    talk_time_percentage numeric(5, 2),
    manager_id uuid REFERENCES public.users (id),
    role public.speaker_role
);
CREATE INDEX idx_speakers_call ON public.speakers (call_id);
CREATE INDEX idx_speakers_email ON public.speakers (email) WHERE email IS NOT NULL;
CREATE INDEX idx_speakers_company_side_email ON public.speakers (company_side, email);
CREATE INDEX idx_speakers_role ON public.speakers (role);
CREATE INDEX idx_speakers_company_role ON public.speakers (company_side, role) WHERE company_side;
CREATE INDEX idx_speakers_manager ON public.speakers (manager_id);

CREATE TABLE public.transcripts (
    id uuid PRIMARY KEY,
    call_id uuid NOT NULL REFERENCES public.calls (id) ON DELETE CASCADE,
    speaker_id uuid REFERENCES public.speakers (id) ON DELETE SET NULL,
    sequence_number integer NOT NULL,
    start_time_ms integer,
    text text NOT NULL,
    sentiment varchar,
    topics varchar[],
    chunk_metadata jsonb,
    full_text_search tsvector
);
CREATE INDEX idx_transcripts_call_sequence ON public.transcripts (call_id, sequence_number);
CREATE INDEX idx_transcripts_full_text ON public.transcripts USING gin (full_text_search);
CREATE INDEX idx_transcripts_speaker ON public.transcripts (speaker_id) WHERE speaker_id IS NOT NULL;
CREATE INDEX idx_transcripts_topics ON public.transcripts USING gin (topics) WHERE topics IS NOT NULL;

CREATE FUNCTION public.transcripts_full_text_search() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
    NEW.full_text_search := to_tsvector('english', NEW.text);
    RETURN NEW;
END
$$;
CREATE TRIGGER transcripts_full_text_search
    BEFORE INSERT OR UPDATE OF text ON public.transcripts
    FOR EACH ROW EXECUTE FUNCTION public.transcripts_full_text_search();

CREATE FUNCTION public.users_set_updated_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER users_updated_at
    BEFORE UPDATE ON public.users
    FOR EACH ROW EXECUTE FUNCTION public.users_set_updated_at();

CREATE TABLE public.opportunities (
    id uuid PRIMARY KEY,
    gong_opportunity_id varchar NOT NULL UNIQUE,
    name varchar NOT NULL,
    account_name varchar,
    owner_email varchar,
    stage varchar,
    close_date date,
    amount numeric(15, 2),
    health_score numeric(5, 2),
    metadata jsonb,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE INDEX idx_opportunities_owner ON public.opportunities (owner_email, updated_at DESC);
CREATE INDEX idx_opportunities_stage ON public.opportunities (stage, close_date);
CREATE INDEX idx_opportunities_health ON public.opportunities (health_score) WHERE health_score IS NOT NULL;

CREATE TABLE public.emails (
    id uuid PRIMARY KEY,
    gong_email_id varchar NOT NULL UNIQUE,
    opportunity_id uuid REFERENCES public.opportunities (id) ON DELETE CASCADE,
    subject varchar,
    sender_email varchar,
    recipients varchar[],
    sent_at timestamptz,
    body_snippet text,
    metadata jsonb,
    created_at timestamptz DEFAULT now()
);
CREATE INDEX idx_emails_opportunity ON public.emails (opportunity_id, sent_at DESC);
CREATE INDEX idx_emails_sent_at ON public.emails (sent_at DESC);

CREATE TABLE public.call_opportunities (
    call_id uuid NOT NULL REFERENCES public.calls (id) ON DELETE CASCADE,
    opportunity_id uuid NOT NULL REFERENCES public.opportunities (id) ON DELETE CASCADE,
    created_at timestamptz DEFAULT now(),
    PRIMARY KEY (call_id, opportunity_id)
);
CREATE INDEX idx_call_opportunities_call ON public.call_opportunities (call_id);
CREATE INDEX idx_call_opportunities_opportunity ON public.call_opportunities (opportunity_id);

CREATE TABLE public.sync_status (
    entity_type varchar PRIMARY KEY,
    last_sync_timestamp timestamptz NOT NULL,
    last_sync_status varchar,
    items_synced integer,
    errors_count integer,
    error_details jsonb,
    updated_at timestamptz DEFAULT now()
);
"""

APP_OWN_DDL = """
CREATE TABLE public.coaching_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_id uuid REFERENCES public.calls (id) ON DELETE CASCADE,
    rep_id uuid REFERENCES public.speakers (id) ON DELETE CASCADE,
    notes text,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE public.analysis_runs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_id uuid REFERENCES public.calls (id) ON DELETE CASCADE,
    model varchar,
    result jsonb,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE public.speaker_role_history (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    speaker_id uuid REFERENCES public.speakers (id) ON DELETE CASCADE,
    old_role public.speaker_role,
    new_role public.speaker_role,
    changed_at timestamptz DEFAULT now()
);

CREATE FUNCTION public.log_speaker_role_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.role IS NOT NULL THEN
            INSERT INTO public.speaker_role_history (speaker_id, old_role, new_role) VALUES (NEW.id, NULL, NEW.role);
        END IF;
    ELSIF NEW.role IS DISTINCT FROM OLD.role THEN
        INSERT INTO public.speaker_role_history (speaker_id, old_role, new_role) VALUES (NEW.id, OLD.role, NEW.role);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER speakers_role_history
    AFTER INSERT OR UPDATE ON public.speakers
    FOR EACH ROW EXECUTE FUNCTION public.log_speaker_role_change();
"""


def _try_extensions(conn: psycopg.Connection) -> list[str]:
    """Create the app's extensions the server has; return the ones it has not (skipped)."""
    missing = []
    for name in EXTENSIONS:
        try:
            with conn.transaction():  # a savepoint: a missing extension must not abort the rest
                conn.execute(f'CREATE EXTENSION IF NOT EXISTS "{name}"')
        except psycopg.Error:
            missing.append(name)
    return missing


def create_app_own_tables(conn: psycopg.Connection) -> None:
    """The app's own tables and the role-history trigger, on contract tables that already exist."""
    with conn.transaction():
        conn.execute(APP_OWN_DDL)


def create_app_schema(conn: psycopg.Connection) -> None:
    """Everything the app's migrations create, in schema `public`, in one transaction."""
    with conn.transaction():
        _try_extensions(conn)
        conn.execute(CONTRACT_DDL)
        conn.execute(APP_OWN_DDL)
