"""What boss and worker share: the task document, the wire protocol, settings.

Pure and light: no SQLAlchemy, no cloud clients, so a worker VM imports
nothing heavy.
"""

__version__ = "0.1.0"
