"""synthmed stage functions: plain Python, one module per stage, no Prefect import."""
