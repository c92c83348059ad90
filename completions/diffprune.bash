
_diffprune_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _DIFFPRUNE_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _diffprune_completion diffprune
