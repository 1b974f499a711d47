"""paradit serve: a long-running video service with an OpenAI-style Videos API (docs/serve.md).

    python -m paradit.serve --port 8000
    torchrun --nproc-per-node 8 -m paradit.serve --model /ckpt/Wan2.2-T2V-A14B-Diffusers --experts split

Parts: cli (flags, start-up, failure handling), server (uvicorn on rank 0, its connections
bounded), guard (what every request passes: Host, key, body size and time), api (the routes),
schema (request checks and the video object), jobs (SQLite state), scheduler (rank 0: jobs to
lanes), engine (every rank: the command channel and the worker), metrics (Prometheus), process (a
server in a subprocess, for tests and benchmarks). Nothing is imported here: the heavy parts load
on first use.
"""
