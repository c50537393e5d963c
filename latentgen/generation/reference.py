"""Print docs/options.md, the option table as a page: `python -m latentgen.generation.reference > docs/options.md`
(tests/test_options.py fails when the committed page is stale)."""

from latentgen.generation.options import page
from latentgen.generation.request import Request

if __name__ == "__main__":
    print(page(Request), end="")
