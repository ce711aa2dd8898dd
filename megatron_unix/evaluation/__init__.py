"""Evaluation of Uni-X checkpoints, the model-independent half: VLMEvalKit benchmark files
(``benchmarks``), the understanding prompts (``prompts``), scorers on canned answers (VLMEvalKit's
reading ``scoring``, the reference's ``scoring_reference``),
the GenEval / DPG-Bench image layouts (``layouts``) and results, paper numbers and the resumable
answer cache (``report``). Nothing here loads a model: the caller passes answers and a painter."""
