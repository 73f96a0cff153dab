"""Reading and checking a push file, and planning its dependency graph.

A push file is a JSON array of task documents or JSON lines (one document a
line, for millions of tasks). It is read once, a chunk at a time
(:mod:`boss.push.reader`); every document is checked into a compact record
(:mod:`boss.push.records`), by helper processes for a large file
(:mod:`boss.push.helpers`), and the dependency graph is planned as the chunks
go by (:mod:`boss.push.planner`). The store (:mod:`boss.store.push`) inserts
each chunk as soon as it is planned, inside the push's one transaction, so
that checking and inserting overlap; any problem rolls the transaction back
and nothing is pushed.
"""

from boss.push.planner import Plan, Planner, document_text, plan
from boss.push.reader import CHUNK_BYTES, MAX_ARRAY_BYTES, MAX_PROBLEMS, checked_chunks
from boss.push.records import MAX_LINE_BYTES, Chunk, check_lines
from boss.push.spool import spool_stdin

__all__ = ["CHUNK_BYTES", "MAX_ARRAY_BYTES", "MAX_LINE_BYTES", "MAX_PROBLEMS", "Chunk", "Plan",
           "Planner", "check_lines", "checked_chunks", "document_text", "plan", "spool_stdin"]
