"""`videonsa demo`: watch a small VideoNSA learn a needle-in-a-long-video task from scratch on a CPU.

>>> from videonsa.demo import DemoSettings, run_demo
>>> result = run_demo("videonsa-demo", DemoSettings(attention="nsa"))
>>> print(result.describe())

Modules: `task` (the videos and training annotations), `model` (the small model, its tokenizer, the window-only
ablation), `training` (the recipe's settings for the demo), `plots`, `run` (the stages). See docs/demo.md.
"""

from videonsa.demo.model import DemoModelSpec, GatesOff
from videonsa.demo.run import DemoResult, DemoSettings, run_demo
from videonsa.demo.task import DemoTask
from videonsa.demo.training import DemoTraining

__all__ = ["DemoModelSpec", "DemoResult", "DemoSettings", "DemoTask", "DemoTraining", "GatesOff", "run_demo"]
