PY ?= .venv/bin/python

.PHONY: demo test lint bench dvc-yaml

demo:            ## the main job: the demo pipeline end to end (Prefect local engine + DVC)
	$(PY) -m flows.cli run --pipeline demo

test:            ## the whole suite (what CI runs)
	$(PY) -m pytest

lint:
	$(PY) -m ruff check flows tasks generators tests benchmarks
	$(PY) -m ruff format --check flows tasks generators tests benchmarks

bench:           ## every benchmark; figures go to stdout, record them in benchmarks/README.md
	$(PY) -m benchmarks.run_all

dvc-yaml:        ## re-render dvc.yaml (every pipeline) from pipelines.yaml + tasks/stages.py
	$(PY) -m flows.cli dvc-yaml --write
