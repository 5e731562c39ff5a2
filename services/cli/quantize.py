"""`mirador quantize MODEL --budget-bits 4.5 | --budget-mb 120 [--calibration FILE]`:
asks the running quantizer for a mixed-precision copy of a decoder, shows progress
with a bar, and prints where the model and its report are.
"""

from __future__ import annotations

import sys

from mirador.v1 import quantizer_pb2, quantizer_pb2_grpc

from services.common.channels import open_channel
from services.common.config import load_config


def add_quantize_command(subparsers) -> None:
    """Adds `quantize` to the `mirador` command's subparsers."""
    quantize = subparsers.add_parser("quantize", help="mixed-precision quantization of a decoder under a size budget")
    quantize.add_argument("model", help="fleet name of a text-generation model")
    budget = quantize.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, help="the size of every layer (MatMuls and the token embedding) at this many bits, 2 to 32, e.g. 4 = uniform 4-bit's size")
    budget.add_argument("--budget-mb", type=float, help="total model size in MB (10^6 bytes)")
    quantize.add_argument("--calibration", default="",
                          help="calibration text: a file inside the model repository (default: packaged text)")
    quantize.add_argument("--block-size", type=int, default=0, help="MatMulNBits block size (default: config, 32)")
    quantize.add_argument("--output-name", default="", help="name of the result (default: MODEL-mixed)")
    quantize.add_argument("--timeout", type=float, default=3600.0, help="deadline in seconds")
    quantize.set_defaults(run=cmd_quantize)


def cmd_quantize(args) -> int:
    config = load_config(args.config)
    request = quantizer_pb2.QuantizeRequest(model=args.model, calibration_path=args.calibration,
                                            block_size=args.block_size, output_name=args.output_name)
    if args.budget_bits is not None:
        request.budget_bits_per_weight = args.budget_bits
    else:
        request.budget_mb = args.budget_mb
    address = config.services.quantizer.client_target
    bars: dict[str, object] = {}
    report = None
    try:
        from tqdm import tqdm
    except ImportError:  # plain lines without tqdm
        tqdm = None
    with open_channel(config, address, aio=False, service="quantizer") as channel:
        stub = quantizer_pb2_grpc.QuantizerStub(channel)
        try:
            for response in stub.Quantize(request, timeout=args.timeout):
                if response.HasField("report"):
                    report = response.report
                    break
                p = response.progress
                if tqdm is None:
                    print(f"[{p.phase}] {p.step}/{p.total} {p.layer} elapsed {p.elapsed_s:.0f}s "
                          f"remaining ~{p.remaining_s:.0f}s", file=sys.stderr, flush=True)
                    continue
                bar = bars.get(p.phase)
                if bar is None:
                    for other in bars.values():
                        other.close()
                    bar = bars[p.phase] = tqdm(total=p.total, desc=p.phase, unit="step", file=sys.stderr)
                bar.n = p.step
                bar.set_postfix_str(f"{p.layer[-40:]} elapsed {p.elapsed_s:.0f}s ~{p.remaining_s:.0f}s left")
        finally:
            for bar in bars.values():
                bar.close()
    if report is None:
        print("mirador: the quantizer ended without a report", file=sys.stderr)
        return 1
    print(f"registered {report.output_model}:{report.output_version}")
    print(f"calibration: {report.calibration}")
    print(f"{'variant':<34} {'MB':>8} {'perplexity':>11} {'KL':>8} {'top-1':>7}")
    for v in report.variants:
        print(f"{v.name:<34} {v.size_bytes / 1e6:>8.1f} {v.perplexity:>11.3f} {v.kl_vs_fp32:>8.4f} "
              f"{100 * v.top1_agreement:>6.1f}%")
    print(f"report: {report.report_path}")
    print(f"plot:   {report.plot_path}")
    return 0
