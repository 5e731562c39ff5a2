"""Serving needs only onnxruntime, tokenizers and numpy: the export toolchain
(torch, transformers, optimum) belongs to `mirador fleet build` alone."""

import subprocess
import sys


def test_services_and_cli_do_not_import_the_export_toolchain():
    code = (
        "import sys\n"
        "import services.model_host.server, services.router.server, services.consensus.server\n"
        "import services.quantizer.server, services.cli.main\n"
        "print(','.join(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"serving imported {loaded}"
