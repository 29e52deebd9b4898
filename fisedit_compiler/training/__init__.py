"""The embedded shapes model: its procedural data (``shapes``), architecture (``model_config``), trainer
(``trainer``, ``fisedit train-shapes``) and a pixel-statistics evaluator of generated scenes (``evaluator``)."""
