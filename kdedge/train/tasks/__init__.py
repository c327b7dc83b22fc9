"""One module per training method; see ``kdedge.train.task.METHODS``."""
