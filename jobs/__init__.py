"""The functions RQ runs. Each expects the app context that AppWorker provides."""
