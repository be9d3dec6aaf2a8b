"""Sphinx configuration of fatebook's documentation site; `bash tools/docs.sh` builds it (see tools/docs.py).

The sources are the notebooks after nbdev's processing, staged by tools/docs.py into `_build/docs/src`; MyST-NB renders
them with execution off, so readers see the outputs stored in the notebooks.
"""
import re
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
_version = re.search(r'__version__\s*=\s*"([^"]+)"', (_root / "fatebook" / "__init__.py").read_text()).group(1)

project = "fatebook"
author = "fatebook developers"
copyright = "fatebook developers"
release = version = _version

extensions = ["myst_nb"]
nb_execution_mode = "off"                   # never run the notebooks here: their stored outputs are the docs
nb_output_stderr = "show"                   # fatebook logs to stderr ("Adding `adata.obsm[...]`"): keep it visible
nb_merge_streams = True
nb_ipywidgets_js = {}                       # the widget manager is a CDN script; stored widgets show static fallbacks
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 4
myst_dmath_double_inline = True
suppress_warnings = ["myst.header"]         # show_doc entries are level-3 headings, sometimes under the title directly

html_theme = "furo"
html_title = f"fatebook {version}"
html_static_path = ["_static"]
html_css_files = ["fatebook.css"]
html_favicon = "_static/favicon.svg"
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {"navigation_with_keys": True}
# MathJax 2 from the site's own static files (put into _static/mathjax from the jupyter-server-mathjax package by
# tools/docs.py after Sphinx has run)
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
# That package ships the STIX-Web fonts only (as Jupyter's classic notebook configures MathJax)
mathjax2_config = {"tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
                               "processRefs": False, "processEnvironments": False, "processEscapes": True,
                               # MyST-NB marks notebook pages mathjax_ignore; Sphinx marks real maths class="math"
                               "processClass": "math|output_area", "ignoreClass": "tex2jax_ignore|mathjax_ignore|document"},
                   "HTML-CSS": {"availableFonts": [], "webFont": "STIX-Web", "imageFont": None, "preferredFont": None},
                   "messageStyle": "none", "menuSettings": {"zoom": "None"}}
