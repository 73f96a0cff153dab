"""The worker: pulls tasks from the boss, stages data, runs commands, reports."""
