# %systemd_postun_with_restart nodeward.service: reload unit files; on upgrade, restart the
# service if it runs, so the new binary takes over (the config file is kept: noreplace).
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper mark-restart-system-units nodeward.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl try-restart nodeward.service >/dev/null 2>&1 || :
    fi
fi
