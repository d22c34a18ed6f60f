"""reelfarm: a render farm for AI films.

Films written as data are planned into frame chunks (:mod:`reelfarm.flows.plan`), rendered
on Ray workers that share each character's identity (:mod:`reelfarm.cluster`), and
stitched into cuts editors open (:mod:`reelfarm.render.stitch`); Prefect records the runs
(:mod:`reelfarm.flows.film`). Importing this package imports neither torch nor Ray.
"""

__version__ = "0.1.0"
