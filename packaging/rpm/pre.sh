# %pre: the worker user, before files are installed (%sysusers_create_compat).
echo 'u hermes - "Hermes kanban worker" /var/lib/hermes /usr/sbin/nologin' | \
    systemd-sysusers --replace=/usr/lib/sysusers.d/hermes-mgr.conf - || :
