# Defaults of every setting, one per line as NAME=value (no shell expansion).
# Override them in .env (see .env.example), or on the command line: make run EPOCHS=5.
# An empty value means the provider's own default, given in the comment.

PROVIDER=local              # local (hosts on this machine, the default) or aws
NODES=2                     # nodes to start; rank 0 is the master
INSTANCE_TYPE=              # local: type-local (type-ssh when SSH_HOSTS is set); aws: type-t2.medium
EPOCHS=2                    # training epochs
RESULTS_DIR=results         # where `make results` puts RESULTS_DIR/<run_id>/
NODES_FILE=nodes.json       # the state the steps pass to each other
RUNNER=                     # local: native; aws: docker
EFS_HOST=                   # NFS/EFS server the nodes mount (aws); empty: none
EFS_FSTYPE=nfs4             # aws: how the nodes mount EFS_HOST: nfs4 (EFS: NFS 4.1) or fuse.sshfs (a folder over SFTP)
EFS_MOUNT_OPTIONS=          # aws: mount options; empty: EFS's NFS 4.1 ones (nfs4), _netdev (fuse.sshfs)
EFS_MOUNT_POINT=            # local: .cluster/efs; aws: /home/ubuntu/efs
USER_DIR=                   # local: .cluster/efs/dcgan; aws: EFS_MOUNT_POINT/dcgan
DCGAN_DIR=                  # local: demo (our small app); aws: USER_DIR/Distributed-DCGAN
CIFAR_DATA_DIR=             # local: synthetic set in .cluster/efs/data/cifar10; aws: EFS_MOUNT_POINT/data/cifar10
DCGAN_PYTHON=               # native runner's Python with torch; local: this project's venv
APP_ARGS=                   # extra arguments for dist_dcgan.py, split as a shell would, e.g. --max_workers 0
SYNTHETIC_IMAGES=2048       # size of the synthetic CIFAR-10 test set made for the local default
CONNECTION_TRIES=3          # SSH liveness attempts at `up`, 5 s apart (aws: until BOOT_TIMEOUT); 0 = no SSH attempt
BOOT_TIMEOUT=300            # aws: seconds `up` keeps trying SSH on new nodes; one still silent is terminated
RUN_TIMEOUT=3600            # wall-clock bound of a run, seconds
STALL_TIMEOUT=300           # a rank whose output has not grown this long (seconds) ends the run as hung; 0 = never
MASTER_PORT=29500           # rendezvous port on rank 0
KEYPAIR_NAME=               # aws: name of your EC2 key pair (key.pem/key.pub in clap_config/private)
MAX_HOURS=3                 # aws: a node terminates itself this long after `make up`, forgotten or not
MARKET=on-demand            # aws: on-demand, or spot (cheaper; EC2 may reclaim a node, which ends the run)
SPOT_MAX_PRICE=             # aws, MARKET=spot: the most USD per hour per node; empty: the on-demand price
SSH_HOSTS=                  # local: your own machines instead of namespace hosts, comma-separated
SSH_USER=root               # local with SSH_HOSTS: the login user (key: clap_config/private/ssh_key)
LOCAL_SUBNET=10.213.0.0/24  # local: the namespace hosts' private subnet
CLAP_PATH=clap_config       # CLAP's configuration, roles and records
SIZES=1,2,4                 # make sweep: cluster sizes to train on, comma-separated whole numbers
INSTANCE_TYPES=             # make sweep: instance types to compare, comma-separated; empty: INSTANCE_TYPE
MAX_SWEEP_COST=5            # aws: make sweep refuses a plan whose cost ceiling (USD) is above this
SAMPLE_ITERATIONS=          # make sweep: predict each point from a sample of this many iterations past the first (at least 8); empty: run each in full
VALIDATE=                   # make sweep with SAMPLE_ITERATIONS: 1 also runs every point in full and compares
DEADLINE=                   # make sweep: minutes; names the cheapest point whose run meets it
BUDGET=                     # make sweep: USD; names the fastest point whose run costs at most this
DRY_RUN=                    # 1: each step prints what it would do (nodes, cost, playbook, commands), touches nothing
RUN_ID=                     # the run `make results` fetches; empty: every run not fetched yet
VERBOSE=                    # 1: stream each step's whole Ansible output (always kept in CLAP_PATH/storage/logs)
