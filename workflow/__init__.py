"""The async answer workflow: each step a Kafka consumer group that scales on its own.

    POST /api/v1/ask {async: true} -> rag.requests -> inference (group rag-inference)
      -> rag.answers.raw -> validator (group rag-validate, the answer rules)
      -> rag.answers (approved) | rag.answers.rejected, and rag.answers the table, which
         GET /api/v1/answers/<id> reads from any web process.

The synchronous path (web/api.py) runs the same steps in the web process, with the same
handlers and no Kafka in between (synchronous.py, runner.py); a streamed answer runs the
answering core's retrieve -> answer -> judge (freshet/answering/answers.py).
"""
