"""The process runtime of ``python -m server``: one server's assembly (``app``) and life
(``process``), worker groups (``workers``), the HAProxy front (``front``), live models
(``model_watch``), the allocator and the loop-busy gauge."""
