"""The operator console on the admin listener: a JSON API (`api`) and HTML pages (`pages`)
over one service (`service`), behind the admin tokens and sessions (`auth`)."""
