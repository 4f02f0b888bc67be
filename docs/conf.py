"""Sphinx configuration of the kwng_jax documentation.

Build (warnings are errors):

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Before reading any source, ``generate.py`` writes ``docs/_generated/``: the
benchmark pages, from the committed JSON under ``benchmarks/results/``, and
copies of the jupytext notebooks, which myst-nb executes at their small
defaults during the build.
"""

import importlib.util
import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

_spec = importlib.util.spec_from_file_location('_kwng_docs_generate', DOCS / 'generate.py')
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)
_generate.main()

import kwng_jax  # noqa: E402

project = 'kwng_jax'
author = 'the kwng_jax authors'
copyright = '2026, the kwng_jax authors'  # noqa: A001
release = kwng_jax.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'myst_nb',
]

# Markdown pages (myst), and the notebooks as jupytext py:percent files.
nb_custom_formats = {'.py': ['jupytext.reads', {'fmt': 'py:percent'}]}
exclude_patterns = ['_build', 'conf.py', 'generate.py', '**.ipynb_checkpoints', 'Thumbs.db',
                    '.DS_Store']
myst_enable_extensions = ['colon_fence']
myst_heading_anchors = 3

# The notebooks run at every build, at the small defaults of their
# parameters cell (as tests/test_notebooks.py runs them).
nb_execution_mode = 'force'
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# The kernel sees the machine as a user would: no fake devices, and the
# inline backend for plots.
os.environ.pop('MPLBACKEND', None)

# API reference from the docstrings (Google style, napoleon).
autodoc_typehints = 'none'
autodoc_member_order = 'bysource'
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
nitpicky = False

html_theme = 'furo'
html_title = f'kwng_jax {release}'
