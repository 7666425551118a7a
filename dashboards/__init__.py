"""The Dash dashboard over a folder of trace folders (views only; numbers come from
paca_prof.analyze). Entry points: dashboards.app.create_app and dashboards.app.serve."""
