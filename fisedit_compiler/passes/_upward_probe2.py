from ..tuning import calibrate
