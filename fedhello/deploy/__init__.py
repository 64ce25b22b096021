"""Setting up a Flower federation for fedhello: certificates, SuperNode keys, and a local trial.

A Flower deployment is one SuperLink (on the server machine) and one SuperNode per client
partition (each on its client machine); docs/flower.md gives the commands for real machines.
What it needs, and where it is made:

    certificates.py  TLS for the SuperLink (a throw-away CA and a server certificate), one
                     OpenSSH key pair per SuperNode, the operator's key -> partition map
    proxy.py         the nginx configuration that puts only the Fleet API on the client-facing
                     address (the Control API stays behind it)
    federation.py    `LocalDeployment`: SuperLink, proxy and SuperNodes as processes on
                     loopback, secured as a real deployment, to try it all on one machine
    cli.py           `fedhello deploy keys` and `fedhello deploy local`

Nothing is imported here: each user imports the module it needs.
"""
