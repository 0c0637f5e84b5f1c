"""Freshet's errors: every failure a user can act on is a ``FreshetError``.

The ``freshet`` command catches ``FreshetError`` once and prints its message (one line that says
what went wrong and what to do) instead of a traceback; anything else is a bug and keeps its
traceback.

Each class keeps the built-in base it had before the tree (``ValueError``, ``RuntimeError``,
``KeyError``, ``psycopg.OperationalError``), so every existing ``except`` still catches it.

The tree (class, module, when it is raised)::

    FreshetError                   freshet.errors          the root: a failure the user can act on
    ├── SettingsError              freshet.settings        a setting (environment variable) has a
    │   │                                                  value that cannot be used (ValueError)
    │   └── ExposureError          freshet.web.server      the web app would listen beyond
    │                                                      loopback with public demo tokens
    ├── ServiceUnavailable         freshet.errors          a service Freshet needs is not
    │   │                                                  reachable; names it, its address and
    │   │                                                  how to start it (`freshet up`)
    │   ├── PostgresUnavailable    freshet.db              PostgreSQL refused or timed out a
    │   │                                                  connection (psycopg.OperationalError)
    │   ├── KafkaUnavailable       freshet.cdc.kafka       nothing listens at the Kafka bootstrap
    │   │                                                  servers
    │   └── ConnectUnavailable     freshet.cdc.connect     the Kafka Connect REST API does not
    │                                                      answer (also a ConnectError)
    ├── SecretMissing              freshet.db              a password file of the embedded
    │                                                      PostgreSQL is missing: `freshet up`
    │                                                      creates it (RuntimeError)
    ├── StackError                 freshet.cdc.processes   a service could not be started or
    │   │                                                  reached, a connector failed
    │   │                                                  (RuntimeError)
    │   ├── PortTakenError         freshet.cdc.processes   a port of a service to start is taken
    │   └── ConnectError           freshet.cdc.connect     the Connect REST API refused a request
    │       └── ConnectUnavailable freshet.cdc.connect     (see ServiceUnavailable)
    ├── TemplateError              freshet.cdc.templates   a connector/config template has a
    │                                                      placeholder without a value (KeyError)
    ├── MappingError               freshet.sync.mapping    the mappings file (FRESHET_MAPPINGS)
    │                                                      cannot be read, or a row does not fit
    │                                                      it (ValueError)
    ├── EmbedderError              freshet.embedder        the embedding model cannot be found,
    │                                                      loaded or run (RuntimeError)
    ├── RulesError                 freshet.answering.rules the answer rules file
    │                                                      (FRESHET_ANSWER_RULES) is bad
    │                                                      (ValueError)
    ├── LLMError                   freshet.answering.llm.base
    │                                                      the answer backend failed or is
    │                                                      misconfigured (RuntimeError)
    ├── MemberFenced               freshet.consumer        another consumer took this worker's
    │                                                      static group.instance.id; this one
    │                                                      stops (RuntimeError)
    ├── QueueUnavailable           freshet.web.publisher   a request could not be handed to
    │                                                      Kafka (RuntimeError)
    └── TokenError                 freshet.web.auth        the tokens file
                                                           (FRESHET_API_TOKENS_FILE) or an
                                                           Authorization header is bad
                                                           (ValueError)
"""

from __future__ import annotations


class FreshetError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""


class ServiceUnavailable(FreshetError):
    """A service Freshet needs (PostgreSQL, Kafka, Kafka Connect) is not reachable.

    The message names the service, its address and how to start it: ``<service> is not
    reachable at <address> (<detail>). <hint>``.
    """

    def __init__(self, service: str, address: str, hint: str, detail: str = "") -> None:
        because = f" ({detail})" if detail else ""
        super().__init__(f"{service} is not reachable at {address}{because}. {hint}")
        self.service = service
        self.address = address
