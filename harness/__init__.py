"""Measurement harnesses shared by tests/ and benchmarks/: never imported by the library.

``orchestrator/``, ``models/`` and ``jobs/`` import nothing from here (``tests/unit/test_layout.py`` holds
them to it); the tests and the benchmark scripts import the modules directly. Modules: ``local_servers``
(moto S3, an mlflow server, a Ray head on 127.0.0.1, free ports), ``measure`` (real DeepSpeed steps on CPU:
allocator peak and collective payloads), ``plan_cases`` (the planner check's 2-worker ViT-tiny runs),
``train_path`` (the training worker's own functions driven outside Ray: the GPU check and its CPU dry run).

Nothing is re-exported here, so that ``harness.local_servers`` stays importable without torch.
"""
