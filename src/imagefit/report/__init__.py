"""Pictures and the run report, drawn with matplotlib from data the other layers return."""
