"""What the load generator itself costs: GuideLLM against its own mock server, at given rates.

The mock server (``guidellm mock-server``) answers with configured latencies and does almost no
work, so the CPU that GuideLLM's processes use per load point is the generator's own cost of
sending requests, reading the streamed tokens and keeping its statistics. Reported per load
point: the generator's cores, and its CPU per request and per streamed token, beside the mock
server's cores.

    python -m slimbench.engines.serving.loadgen_cost --rates 1 4 16 --seconds 30 --tokens 32

Run it inside a loopback-only namespace, or on a machine where a loopback port is fine to open.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from slimbench.engines.serving import analysis, loadgen, session
from slimbench.engines.serving.process import ServerProcess
from slimbench.engines.serving.workload import WorkloadSpec, build_rows, write_rows
from slimbench.engines.workers import free_loopback_port


def measure_cost(rates: list[float], seconds: float, tokens: int, itl_ms: float = 5.0) -> list[dict[str, Any]]:
    from slimbench.zoo.models import gpt2_tokenizer

    loadgen.ensure_env()
    with tempfile.TemporaryDirectory(prefix="slimbench-loadgen-cost-") as tmp:
        work = Path(tmp)
        tok = gpt2_tokenizer()
        tok.save_pretrained(work / "tok")
        rows = build_rows(tok, WorkloadSpec(requests=512, max_prompt_tokens=256, min_output_tokens=tokens,
                                            max_output_tokens=tokens))
        write_rows(rows, work / "requests.jsonl")
        port = free_loopback_port()
        server = ServerProcess("guidellm mock", [str(loadgen.executable()), "mock-server", "--host", "127.0.0.1",
                                                 "--port", str(port), "--model", "slimbench", "--ttft-ms", "20",
                                                 "--itl-ms", str(itl_ms), "--output-tokens", str(tokens)],
                               port, work / "mock.log", env=loadgen.child_env())
        scenario = loadgen.scenario(target=server.url, model="slimbench", tokenizer=work / "tok",
                                    data=work / "requests.jsonl", output=work / "report.json",
                                    profile={"kind": "constant", "rate": rates}, max_seconds=seconds,
                                    max_requests=100000, warmup_requests=0, request_timeout_s=60, seed=0)
        plan = session.Plan(workdir=work, scenario=scenario, warm_requests=[], start_timeout_s=300,
                            run_timeout_s=300 + len(rates) * (seconds + 60), request_timeout_s=60)
        m = session.measure(server, plan)
    out = []
    for p in analysis.load_points(m.report):
        cpu = analysis.cpu_between(m.timeline, p.start, p.end)
        gen_s = cpu.get("loadgen_cores", 0.0) * p.duration_s
        toks = sum(p.samples["output_tokens"])
        out.append({"rate": p.target, "requests_per_s": p.request_throughput, "tokens_per_s": p.output_tokens_per_s,
                    "loadgen_cores": cpu.get("loadgen_cores"), "mock_server_cores": cpu.get("server_cores"),
                    "other_cores": cpu.get("other_cores"),
                    "loadgen_cpu_ms_per_request": 1e3 * gen_s / max(p.successful, 1),
                    "loadgen_cpu_ms_per_token": 1e3 * gen_s / max(toks, 1),
                    "dispatch_delay_p90_ms": p.dispatch_delay_p90_ms})
    return [{"loadgen_cpu_s_total": m.loadgen_cpu_s, "wall_s": m.wall_s}, *out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 4.0, 16.0], help="request rates (req/s)")
    ap.add_argument("--seconds", type=float, default=30.0, help="per load point")
    ap.add_argument("--tokens", type=int, default=32, help="streamed tokens per request")
    args = ap.parse_args()
    print(json.dumps(measure_cost(args.rates, args.seconds, args.tokens), indent=1))


if __name__ == "__main__":
    main()
