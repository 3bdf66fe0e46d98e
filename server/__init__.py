"""The renderfarm server: REST API, scheduler, model manager and persistence."""
