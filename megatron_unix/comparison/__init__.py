"""The paper's Table 4 from one command (``tools/compare.py``): the shared transformer, HardMoE, MoT and
Uni-X trained on the same data at one token budget, exported, evaluated and reported side by side.

``plan`` turns the settings into the programs to run (steps in stages), ``runner`` runs them as
subprocesses, resumably, locally or as slurm jobs, and ``report`` gathers what they wrote into
report.md, report.json and two plots."""
