# Developer shortcuts. `make bench` runs the whole benchmark (scripts/bench.sh)
# and rewrites docs/BENCHMARKS.md; pass options with ARGS, e.g.
#   make bench ARGS="--models smollm2 --repeat 3"
#   make bench-quick            # a short smoke run of every part
.PHONY: bench bench-quick bench-report

bench:
	bash scripts/bench.sh $(ARGS)

bench-quick:
	bash scripts/bench.sh --quick --results .cache/bench-quick --out .cache/bench-quick/BENCHMARKS.md $(ARGS)

bench-report:
	bash scripts/bench.sh --report-only $(ARGS)
