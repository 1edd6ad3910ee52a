"""The benchmark behind ``persona-steering bench``: ``run.py`` is the stage; ``generation.py``
answers one CMA-ES generation three ways and times them (plus the extraction forward and personas
in lockstep); ``stages.py`` times vectors and optimize cold and warm; ``judge.py`` the judge
fan-out; ``render.py`` the table and plot; ``settings.py`` what a run measures."""

from persona_steering.bench.generation import METHODS
from persona_steering.bench.run import run_bench
from persona_steering.bench.settings import BenchSettings

__all__ = ["METHODS", "BenchSettings", "run_bench"]
