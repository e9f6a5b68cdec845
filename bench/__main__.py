"""`python -m bench`: the throughput benchmark (bench/run.py)."""

from bench.run import main

main()
