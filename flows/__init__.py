"""synthmed Prefect layer: flows that chain the stage functions, deployments, CLI."""
