"""The application's schema: the contract every destination table follows (APP_SCHEMA.md).

The app's own migrations create these tables; the pipeline creates them only in a database that
has none of them, so the app runs on a database the pipeline started. `{app}` is the destination
schema, filled (quoted) by the runtime. Statements run in order, each once.
"""

from __future__ import annotations

#: Extensions the app's migrations install. Tried one by one; one that the server lacks (or the
#: role may not create) is logged and skipped: nothing the pipeline writes needs them.
EXTENSIONS = ("uuid-ossp", "pgcrypto", "pg_trgm")

#: Enum types: name → labels.
ENUMS: dict[str, tuple[str, ...]] = {
    "speaker_role": ("ae", "se", "csm", "support"),
    "user_role": ("admin", "manager", "rep"),
}

#: Contract tables in creation order (referenced tables first): name → CREATE TABLE body.
TABLES: dict[str, str] = {
    "users": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        email varchar NOT NULL UNIQUE,
        name varchar NOT NULL,
        role {app}.user_role NOT NULL DEFAULT 'rep',
        created_at timestamp DEFAULT now(),
        updated_at timestamp DEFAULT now()""",
    "calls": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        gong_call_id varchar NOT NULL UNIQUE,
        title varchar,
        scheduled_at timestamp,
        duration_seconds integer,
        call_type varchar,
        product varchar,
        created_at timestamp DEFAULT now(),
        processed_at timestamp,
        metadata jsonb,
        prefect_reps varchar[] DEFAULT ARRAY[]::varchar[],
        overall_score integer,
        date date""",
    "speakers": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        call_id uuid NOT NULL REFERENCES {app}.calls (id) ON DELETE CASCADE,
        name varchar NOT NULL,
        email varchar,
        company_side boolean NOT NULL DEFAULT false,
        talk_time_seconds integer,
        talk_time_percentage numeric(5,2),
        manager_id uuid REFERENCES {app}.users (id),
        role {app}.speaker_role""",
    "transcripts": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        call_id uuid NOT NULL REFERENCES {app}.calls (id) ON DELETE CASCADE,
        speaker_id uuid REFERENCES {app}.speakers (id) ON DELETE SET NULL,
        sequence_number integer NOT NULL,
        start_time_ms integer,
        text text NOT NULL,
        sentiment varchar,
        topics varchar[],
        chunk_metadata jsonb,
        full_text_search tsvector""",
    "opportunities": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        gong_opportunity_id varchar NOT NULL UNIQUE,
        name varchar NOT NULL,
        account_name varchar,
        owner_email varchar,
        stage varchar,
        close_date date,
        amount numeric(15,2),
        health_score numeric(5,2),
        metadata jsonb,
        created_at timestamptz DEFAULT now(),
        updated_at timestamptz DEFAULT now()""",
    "emails": """
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        gong_email_id varchar NOT NULL UNIQUE,
        opportunity_id uuid REFERENCES {app}.opportunities (id) ON DELETE CASCADE,
        subject varchar,
        sender_email varchar,
        recipients varchar[],
        sent_at timestamptz,
        body_snippet text,
        metadata jsonb,
        created_at timestamptz DEFAULT now()""",
    "call_opportunities": """
        call_id uuid NOT NULL REFERENCES {app}.calls (id) ON DELETE CASCADE,
        opportunity_id uuid NOT NULL REFERENCES {app}.opportunities (id) ON DELETE CASCADE,
        created_at timestamptz DEFAULT now(),
        PRIMARY KEY (call_id, opportunity_id)""",
    "sync_status": """
        entity_type varchar PRIMARY KEY,
        last_sync_timestamp timestamptz NOT NULL,
        last_sync_status varchar,
        items_synced integer,
        errors_count integer,
        error_details jsonb,
        updated_at timestamptz DEFAULT now()""",
}

#: Indexes the app relies on: name → (table, what follows `ON table`).
INDEXES: dict[str, tuple[str, str]] = {
    "idx_calls_scheduled_product": ("calls", "(scheduled_at DESC, product)"),
    "idx_calls_date": ("calls", "(date DESC NULLS LAST)"),
    "idx_calls_processed_at": ("calls", "(processed_at) WHERE processed_at IS NOT NULL"),
    "idx_calls_prefect_reps": ("calls", "USING gin (prefect_reps)"),
    "idx_calls_overall_score": ("calls", "(overall_score) WHERE overall_score IS NOT NULL"),
    "idx_speakers_call_id": ("speakers", "(call_id)"),
    "idx_speakers_email": ("speakers", "(email) WHERE email IS NOT NULL"),
    "idx_speakers_company_side_email": ("speakers", "(company_side, email)"),
    "idx_speakers_role": ("speakers", "(role)"),
    "idx_speakers_company_side_role": ("speakers", "(company_side, role) WHERE company_side"),
    "idx_speakers_manager_id": ("speakers", "(manager_id)"),
    "idx_transcripts_call_sequence": ("transcripts", "(call_id, sequence_number)"),
    "idx_transcripts_full_text_search": ("transcripts", "USING gin (full_text_search)"),
    "idx_transcripts_speaker_id": ("transcripts", "(speaker_id) WHERE speaker_id IS NOT NULL"),
    "idx_transcripts_topics": ("transcripts", "USING gin (topics) WHERE topics IS NOT NULL"),
    "idx_users_email_role": ("users", "(email, role)"),
    "idx_opportunities_owner": ("opportunities", "(owner_email, updated_at DESC)"),
    "idx_opportunities_stage": ("opportunities", "(stage, close_date)"),
    "idx_opportunities_health": ("opportunities", "(health_score) WHERE health_score IS NOT NULL"),
    "idx_emails_opportunity": ("emails", "(opportunity_id, sent_at DESC)"),
    "idx_emails_sent_at": ("emails", "(sent_at DESC)"),
    "idx_call_opportunities_call": ("call_opportunities", "(call_id)"),
    "idx_call_opportunities_opportunity": ("call_opportunities", "(opportunity_id)"),
}

#: Triggers the app relies on: the transcripts' full-text column, and users.updated_at.
#: Functions are created with the tables (CREATE OR REPLACE would rewrite an app's own).
TRIGGERS: tuple[str, ...] = (
    """CREATE FUNCTION {app}.transcripts_full_text_search() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN NEW.full_text_search := to_tsvector('english', coalesce(NEW.text, '')); RETURN NEW; END $$""",
    """CREATE TRIGGER transcripts_full_text_search BEFORE INSERT OR UPDATE OF text ON {app}.transcripts
       FOR EACH ROW EXECUTE FUNCTION {app}.transcripts_full_text_search()""",
    """CREATE FUNCTION {app}.users_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN NEW.updated_at := now(); RETURN NEW; END $$""",
    """CREATE TRIGGER users_touch_updated_at BEFORE UPDATE ON {app}.users
       FOR EACH ROW EXECUTE FUNCTION {app}.users_touch_updated_at()""",
)
