"""The documentation's Python samples are the README's, which tests/test_readme.py runs.

The pages under docs/ show code only by including marked regions of
README.md (``<!-- sample: NAME -->`` ... ``<!-- end sample: NAME -->``);
these tests check that every region a page includes exists and holds one
Python block, and that no page carries a Python block of its own, which no
test would run.
"""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / 'README.md').read_text()
PAGES = sorted((REPO / 'docs').glob('*.md'))
INCLUDE = re.compile(r'```\{include\} \.\./README\.md\n:start-after: (.*?)\n:end-before: (.*?)\n```')


def test_every_included_readme_region_exists_and_holds_one_python_block():
  included = [m.groups() for page in PAGES for m in INCLUDE.finditer(page.read_text())]
  assert included
  for start, end in included:
    assert README.count(start) == 1 and README.count(end) == 1, (start, end)
    region = README.split(start, 1)[1].split(end, 1)[0]
    assert len(re.findall(r'```python\n', region)) == 1, start


def test_pages_have_no_python_samples_of_their_own():
  for page in PAGES:
    assert '```python' not in page.read_text(), f'{page.name}: put the sample in README.md'


def test_the_api_page_lists_every_public_name():
  import kwng_jax
  api = (REPO / 'docs' / 'api.md').read_text()
  for name in kwng_jax.__all__:
    assert (f'kwng_jax.{name}\n' in api), f'docs/api.md does not document kwng_jax.{name}'
