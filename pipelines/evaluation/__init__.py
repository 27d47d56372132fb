"""``ldm eval``: measured quality of the demo models on held-out samples of the shapes domain.

Each evaluation draws its prompts, images and maps from a data seed the training never used
(training uses seeds 0-4; evaluation defaults to 1000), generates with the model, and scores the
outputs with the domain's own detector (``ldm.data.shapes.detect_objects``)."""

from pipelines.evaluation.adherence import score_adherence, summarize_adherence
from pipelines.evaluation.runner import EVALUATIONS, EvalOptions, run_evaluation

__all__ = ["EVALUATIONS", "EvalOptions", "run_evaluation", "score_adherence", "summarize_adherence"]
