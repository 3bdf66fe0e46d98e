"""The web UI: a static single-page app served at ``/`` (no build step), talking to the REST API."""
