"""Only what pyproject.toml cannot say: ship ``hadapeft_peft_hint.pth`` at the top of site-packages, so that loading
a hadapeft adapter without ``import hadapeft`` fails with a message saying so (see ``_hadapeft_peft_hint.py``)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hadapeft_peft_hint.pth"


class BuildPyWithHint(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithHint})
