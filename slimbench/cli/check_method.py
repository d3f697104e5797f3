"""`check-method NAME`: run the method contract (the tests every registered method passes).

For a plugin author: install the plugin (``pip install -e .``), then
``slimbench check-method my-method``. It loads tiny Llama-, OPT- and GPT-2-shaped models,
runs the method with tiny budgets, and checks what it reports against the weights
(slimbench.devtools.contract lists every check).
"""

from __future__ import annotations

import argparse

from slimbench.errors import SuiteError
from slimbench.sweep.yaml_limits import load_text


def cmd_check_method(args: argparse.Namespace) -> int:
    from slimbench.devtools.contract import TINY_ARCHS, check_method, contract_params
    from slimbench.registry import METHODS

    method = METHODS.get(args.name, source="check-method", field="NAME")
    extra = {}
    for assignment in args.set:
        if "=" not in assignment:
            raise SuiteError(f"--set expects key=value, got {assignment!r}", source="check-method")
        key, value = assignment.split("=", 1)
        extra[key] = load_text(value, f"--set {key}")
    unknown = sorted(set(extra) - set(method.config.model_fields))
    if unknown:
        known = ", ".join(method.config.model_fields)
        raise SuiteError(f"unknown parameter(s) {unknown} of {method.name}; known: {known}", source="check-method")
    archs = tuple(args.arch or TINY_ARCHS)
    provider = METHODS.provider(method.name) or "built in"
    print(f"{method.name} [{method.family}] ({provider}), version {method.version}")
    print(f"  needs calibration data: {'yes' if method.uses_calibration else 'no'}; needs a GPU: "
          f"{'yes' if method.requires_gpu else 'no'}; may follow: {', '.join(method.follows) or 'nothing'}")
    print(f"  parameters used: {contract_params(method, extra)}")
    outcomes = check_method(method, archs=archs, extra=extra, determinism=not args.no_determinism)
    for o in outcomes:
        print(f"  {o}")
    failed = [o for o in outcomes if o.status == "fail"]
    ran = [o for o in outcomes if o.check.startswith("runs on") and o.status == "pass"]
    verdict = "FAILED" if failed else ("passed" if ran else "passed, but refused every model")
    print(f"{method.name}: contract {verdict} ({len(failed)} failing check(s))")
    return 1 if failed else 0


def register(sub) -> None:
    p = sub.add_parser("check-method", help="run the method contract (what every registered method must pass)")
    p.add_argument("name", help="a registered method name (built in or from a plugin)")
    p.add_argument(
        "--arch", action="append", choices=["llama", "opt", "gpt2"], help="tiny model(s) to use (default: all)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config parameter for the runs, value as YAML (on top of the method's test_params)")
    p.add_argument("--no-determinism", action="store_true", help="skip the run-twice determinism check")
    p.set_defaults(fn=cmd_check_method)
