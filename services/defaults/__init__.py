"""Data shipped with Mirador: the default config (`mirador.yaml`) and the fitted score
calibrations (`calibration/<model>.json`). Package data, so that a wheel install finds them;
`config/` at the repository root links here."""

from pathlib import Path

DEFAULTS_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = DEFAULTS_DIR / "mirador.yaml"
CALIBRATION_DIR = DEFAULTS_DIR / "calibration"
