"""The Flask app: retrieval, answers with citations, web UI and REST API."""
