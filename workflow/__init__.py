"""The async answer workflow: each step a Kafka consumer group that scales on its own.

    POST /api/v1/ask {async: true} -> rag.requests -> inference (group rag-inference)
      -> rag.answers.raw -> validator (group rag-validate, the answer rules)
      -> rag.answers (approved) | rag.answers.rejected, and rag.answers the table, which
         GET /api/v1/answers/<id> reads from any web process.

The synchronous path (web/api.py over freshet/answering/answers.py) runs the same
retrieve -> answer -> judge steps.
"""
