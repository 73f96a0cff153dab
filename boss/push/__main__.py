"""A helper process of a push: ``python -m boss.push`` (see :mod:`boss.push.helpers`)."""

from boss.push.helpers import serve

serve()
