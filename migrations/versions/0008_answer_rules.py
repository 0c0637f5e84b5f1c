"""Answer rules owned by another team: a table they edit through SQL
(FRESHET_ANSWER_RULES=table), and an append-only audit of every verdict.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE rag.answers ADD COLUMN rules_version text")
    op.execute(
        "COMMENT ON COLUMN rag.answers.rules_version IS 'digest@version of the rule set that "
        "judged the answer'"
    )
    op.execute(
        """
        CREATE TABLE rag.answer_rules (
            name         text        PRIMARY KEY CHECK (name <> ''),
            kind         text        NOT NULL,
            params       jsonb       NOT NULL DEFAULT '{}'::jsonb
                CHECK (jsonb_typeof(params) = 'object'),
            enabled      boolean     NOT NULL DEFAULT true,
            description  text,
            updated_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.answer_rules IS 'the answer rules when FRESHET_ANSWER_RULES=table: "
        "one row per rule (kind and its parameters as in a rules file); validators and web "
        "processes pick up a change within FRESHET_ANSWER_RULES_RELOAD_S'"
    )
    # updated_at follows every change, so the rule set's version names when it last changed.
    op.execute(
        """
        CREATE FUNCTION rag.answer_rules_touch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at := now();
            RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER answer_rules_touch BEFORE UPDATE ON rag.answer_rules"
        " FOR EACH ROW EXECUTE FUNCTION rag.answer_rules_touch()"
    )
    # A deleted rule leaves no row: the rule set's version must still change, so deletes are
    # counted here.
    op.execute(
        """
        CREATE TABLE rag.answer_rules_changes (
            id          integer     PRIMARY KEY DEFAULT 1 CHECK (id = 1),
            changed_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("INSERT INTO rag.answer_rules_changes DEFAULT VALUES")
    op.execute(
        """
        CREATE FUNCTION rag.answer_rules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE rag.answer_rules_changes SET changed_at = clock_timestamp();
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER answer_rules_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
        " ON rag.answer_rules FOR EACH STATEMENT EXECUTE FUNCTION rag.answer_rules_changed()"
    )

    op.execute(
        """
        CREATE TABLE rag.answer_audit (
            id             bigserial   PRIMARY KEY,
            request_id     text        NOT NULL,
            answer_digest  text        NOT NULL,
            rules_digest   text        NOT NULL,
            rules_version  text        NOT NULL,
            rules_source   text        NOT NULL,
            status         text        NOT NULL CHECK (status IN ('approved', 'rejected')),
            outcomes       jsonb       NOT NULL,
            judged_at      timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_answer_audit_verdict UNIQUE (request_id, rules_digest)
        )
        """
    )
    op.execute(
        "COMMENT ON TABLE rag.answer_audit IS 'every verdict on an answer, append-only: the "
        "request, a digest of the answer judged, the rule set (digest and version) and each "
        "rule''s outcome; one row per request and rule set, a redelivered answer adds none'"
    )
    op.execute(
        """
        CREATE FUNCTION rag.answer_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'rag.answer_audit is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER answer_audit_append_only BEFORE UPDATE OR DELETE ON rag.answer_audit"
        " FOR EACH ROW EXECUTE FUNCTION rag.answer_audit_append_only()"
    )
    op.execute(
        "CREATE TRIGGER answer_audit_no_truncate BEFORE TRUNCATE ON rag.answer_audit"
        " FOR EACH STATEMENT EXECUTE FUNCTION rag.answer_audit_append_only()"
    )
    op.execute("CREATE INDEX ix_answer_audit_judged_at ON rag.answer_audit (judged_at)")


def downgrade() -> None:
    op.execute("DROP TABLE rag.answer_audit")
    op.execute("DROP FUNCTION rag.answer_audit_append_only()")
    op.execute("DROP TABLE rag.answer_rules")
    op.execute("DROP TABLE rag.answer_rules_changes")
    op.execute("DROP FUNCTION rag.answer_rules_changed()")
    op.execute("DROP FUNCTION rag.answer_rules_touch()")
    op.execute("ALTER TABLE rag.answers DROP COLUMN rules_version")
