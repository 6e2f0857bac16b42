"""The web UI: jobs that outlive the page and the server (jobs.py, runner.py)."""
