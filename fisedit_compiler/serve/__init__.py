"""Serving edits over HTTP: the API routes over the session service (`serve.api.create_app`)."""
