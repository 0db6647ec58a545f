# %postun: reload unit files after an erase; state is removed on erase only, never the
# Hermes root (/var/lib/hermes, the user's board) and never the user.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ]; then
    rm -rf /run/hermes-mgr
fi
